"""Where a layer's training activations come from: ``shards`` (an extraction on disk, read
back per layer) or ``online`` (the frozen model's forward pass, all layers at once)."""
