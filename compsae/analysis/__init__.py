"""compsae.analysis"""
