"""Workers: the engine loop and roles (context, generation, both), the engine, and the CLI."""
