"""DeComFL (Li et al., 2024) as an outside algorithm on fedtune's algorithm API.

``examples.decomfl.decomfl:DeComFL`` is the class a run config names; ``payload`` is its wire
format and ``replica`` its model side (exact seed coefficients, the node's on-disk view). See
README.md in this folder.
"""
