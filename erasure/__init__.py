"""ConceptSmith erasure methods (each module registers its plugins on import)."""
