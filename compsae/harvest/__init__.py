"""compsae.harvest"""
