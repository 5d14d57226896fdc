"""Event data model: frozen structure-of-arrays containers shared by every stage."""

from kernels.edm.cells import Cells, CellsBatch, merge_duplicate_cells, sort_cells

__all__ = ["Cells", "CellsBatch", "merge_duplicate_cells", "sort_cells"]
