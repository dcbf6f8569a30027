"""The small core every method uses: adapter layers, injection, hooks, registry, gradients, linear algebra."""
