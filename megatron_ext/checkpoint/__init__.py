"""How a run is saved and read, never when (that is the checkpointer component's)."""
