"""What several tasks share, apart from the tasks themselves (every module directly in
``pipelines/`` is a task): the stages of the image experiments (``image_stages``), the
attribution score sets (``attribution``) and the cross-class classifier (``crossclass``)."""
