"""What the API takes and answers, as pydantic models.

``bodies`` holds request bodies and parameters (it needs FastAPI); the other
modules hold the answers, one per area: models the API composes, and pydantic
dataclasses that extend the services' views an answer carries as it is. They
import no FastAPI, so the Python client (``mi2b2.client``) parses answers into
the same types the OpenAPI document describes without loading the server.
"""
