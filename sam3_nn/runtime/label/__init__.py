"""Label whole datasets: images and concepts in, COCO / YOLO-seg labels out (``sam3-nn label``).

``options`` (images, concepts, thresholds, NMS, exemplars), ``infer`` (batched library calls,
post-processing), ``store`` (resumable shards and their index), ``export`` (COCO, YOLO-seg),
``job`` (one machine), ``ray_job`` (Ray Data), ``command`` (the command line's glue).
"""
