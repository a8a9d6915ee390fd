"""The engines (train), the Trainer loop, its hooks, checkpoints and the launcher."""
