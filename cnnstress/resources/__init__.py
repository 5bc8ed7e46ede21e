"""Package data (read with importlib.resources), each file's header (or README) naming its source and licence.

* cifar10-test-labels.txt          the official CIFAR-10 test label sequence (10,000 class ids)
* cifar10-test-label-review.csv    a human review of 275 flagged CIFAR-10 test images (54 label errors)

Both from cleanlab/label-errors (Apache-2.0); see cnnstress.xai.label_review.

* frost/frost1.png ... frost5.jpg  the frost photographs of CIFAR-10-C's frost corruption, byte for byte from
                                   hendrycks/robustness (Apache-2.0, LICENSE beside them; README.md there gives
                                   their SHA-256 and why they ship unresized); see cnnstress.robustness.frost.
"""
