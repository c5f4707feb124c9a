"""moesaic.model.attention"""
