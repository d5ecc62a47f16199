"""The services: each a short loop, consume -> fold -> persist/emit, over the same domain fold."""
