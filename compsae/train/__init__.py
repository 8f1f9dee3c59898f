"""compsae.train"""
