"""One module per fuzz target: setup(), one_input(data), seeds()."""
