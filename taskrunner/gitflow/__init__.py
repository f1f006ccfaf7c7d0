"""The git workflow (DESIGN.md §6): the repository to the Worker, changes back as branches, pushes, syncs, triggers."""
