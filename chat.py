"""python chat.py [...]  ==  kimi-mlx chat [...]"""
from kimi_mlx.cli import main

main("chat", "python chat.py")
