"""moesaic.trainer"""
