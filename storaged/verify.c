#include "kvd_internal.h"
