"""Package data (read with importlib.resources), each file's header naming its source and licence.

* cifar10-test-labels.txt          the official CIFAR-10 test label sequence (10,000 class ids)
* cifar10-test-label-review.csv    a human review of 275 flagged CIFAR-10 test images (54 label errors)

Both from cleanlab/label-errors (Apache-2.0); see cnnstress.xai.label_review.
"""
