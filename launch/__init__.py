"""moesaic.launch"""
