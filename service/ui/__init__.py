"""`autointerp ui`: a read-only web browser over the store's runs, latents and partners."""
