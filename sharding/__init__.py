"""Plan → mesh, logical axis rules, and activation constraints."""
