__version__ = "0.32.4.dev0"
