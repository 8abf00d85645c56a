"""2D human pose: COCO-format keypoint data, keyed top-down views, SimCC and heatmap
heads, PCK/AP metrics and the ClassroomKD pose losses (rows of joint logits ranked by
PCK)."""
