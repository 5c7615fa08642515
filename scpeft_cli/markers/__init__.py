"""Marker genes from attention (`scpeft markers`): the last layer's q and k as the adapted model computes
them (`capture`), the query the cell embedding reads (`Backbone.pooling_weights`), scPEFT's rank-normalised scores per cell
and their contrast between cell states (`scoring`), and the files written (`outputs`)."""
