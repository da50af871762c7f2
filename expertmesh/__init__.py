"""expertmesh"""
