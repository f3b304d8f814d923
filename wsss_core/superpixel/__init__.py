"""Grid superpixels (the 3x3 association map Q of SpixelFCN-style networks), their operators, networks and
classical stand-ins: the substrate of SP-CAM and MSA."""
