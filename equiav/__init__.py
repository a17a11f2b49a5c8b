"""EquiAV reproduced end to end."""
