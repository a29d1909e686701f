"""The live VJ web app served by `rtdiffusion demo`."""
