#include "core/version.h"

namespace switchyard {

const char* Version() { return SWITCHYARD_VERSION; }

}  // namespace switchyard
