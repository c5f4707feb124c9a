"""moesaic.model.moe"""
