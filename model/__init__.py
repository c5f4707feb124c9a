"""moesaic.model"""
