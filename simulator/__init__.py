"""A discrete-event simulation of a splitserve cluster that routes with the live router's policy objects."""
