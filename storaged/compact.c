/* compact.c - placeholder until compaction lands in this same change */
#include "kvd_internal.h"
