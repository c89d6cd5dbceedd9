import logging

logger = logging.getLogger("sd_accel")
