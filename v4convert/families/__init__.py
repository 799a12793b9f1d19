"""Model families: tensor roles, published layouts and (later) typed configs, one row per family."""
