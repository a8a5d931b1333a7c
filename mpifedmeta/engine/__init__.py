"""How a block's meta-gradients are computed: backends, their choice, compiled rounds, agent chunks."""
