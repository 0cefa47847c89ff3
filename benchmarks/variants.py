"""Router variants shared by the benchmarks: the paper's eight, as MoEConfig field overrides."""

VARIANTS = {
    "top1": dict(top_k=1, fill_in=False, ir_mode=None, straight_through=True),
    "top1_ir": dict(top_k=1, fill_in=False, ir_mode="all", straight_through=True),
    "top1_fr": dict(top_k=1, fill_in=True, ir_mode=None, straight_through=False),
    "top1_ir_fr": dict(top_k=1, fill_in=True, ir_mode="ignore_kth", straight_through=False),
    "top2": dict(top_k=2, fill_in=False, ir_mode=None, straight_through=False),
    "top2_ir": dict(top_k=2, fill_in=False, ir_mode="any", straight_through=False),
    "top2_fr": dict(top_k=2, fill_in=True, ir_mode=None, straight_through=False),
    "top2_ir_fr": dict(top_k=2, fill_in=True, ir_mode="ignore_kth", straight_through=False),
}
