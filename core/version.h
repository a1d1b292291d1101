// The project's version: CMake's project(VERSION) in the top-level
// CMakeLists.txt, the one place it is written.
#ifndef SWITCHYARD_CORE_VERSION_H_
#define SWITCHYARD_CORE_VERSION_H_

namespace switchyard {

// e.g. "0.1.0".
const char* Version();

}  // namespace switchyard

#endif  // SWITCHYARD_CORE_VERSION_H_
