"""mi2b2: an IRB-governed research gateway between researchers and the hospital PACS."""

__version__ = "0.1.0"
