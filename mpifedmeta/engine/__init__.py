"""How a block's meta-gradients are computed: backends, their choice, capture, agent chunks."""
