"""moesaic.parallel"""
