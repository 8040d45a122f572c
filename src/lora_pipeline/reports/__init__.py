"""The HTML pages a run writes: the training loss chart (`loss_chart`) and the whole run's page (`run_page`).
Both are self-contained (no network), so they open from artifact stores and offline laptops."""
