"""The package version, in a leaf module so that any module can name it
without importing the package's front (cnnstress/__init__ imports the Study)."""
__version__ = "0.1.0"
