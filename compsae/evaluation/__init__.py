"""compsae.evaluation"""
