"""What the API takes and answers, as pydantic models.

``bodies`` holds request bodies and parameters (it needs FastAPI); the other
modules hold the answers, one per area, and import nothing but pydantic, so the
Python client (``mi2b2.client``) parses answers into the same models the
OpenAPI document describes without loading the server.
"""
