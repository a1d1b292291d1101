# Model code that runs on the CUDA backend lives beside its CPU version (the
# dense half in attention_service/, the experts in expert_service/, the
# runner in gateway/). These functions build it against the real backend
# (switchyard_cuda, when SWITCHYARD_CUDA is ON) and against its CPU emulator
# (switchyard_cuda_emulated, when SWITCHYARD_CUDA_EMULATOR is ON), from one
# list of sources.

# switchyard_cuda_library(NAME SOURCES ... LIBS ...): NAME linked with LIBS
# and switchyard_cuda; NAME_emulated linked with switchyard_cuda_emulated and
# LIBS, each X that has an X_emulated swapped for it.
function(switchyard_cuda_library name)
  cmake_parse_arguments(ARG "" "" "SOURCES;LIBS" ${ARGN})
  if(SWITCHYARD_CUDA)
    add_library(${name} ${ARG_SOURCES})
    target_link_libraries(${name} PUBLIC ${ARG_LIBS} switchyard_cuda)
  endif()
  if(SWITCHYARD_CUDA_EMULATOR)
    _switchyard_swap_emulated(libs ${ARG_LIBS})
    add_library(${name}_emulated STATIC ${ARG_SOURCES})
    target_link_libraries(${name}_emulated PUBLIC ${libs} switchyard_cuda_emulated)
  endif()
endfunction()

# switchyard_link_cuda(TARGET [CUDA_LIBS L...] [EMULATED_NAME N]): TARGET
# (a library or executable whose sources and link libraries are final) gains
# its --device cuda branch: CUDA_LIBS (made by switchyard_cuda_library) are
# linked when SWITCHYARD_CUDA is ON. With the emulator, N (default
# TARGET_emulated) is a copy of TARGET from TARGET's own sources, with each
# linked X that has an X_emulated swapped for it and the emulated CUDA_LIBS
# added, so a file added to TARGET reaches its copy.
function(switchyard_link_cuda target)
  cmake_parse_arguments(ARG "" "EMULATED_NAME" "CUDA_LIBS" ${ARGN})
  if(NOT ARG_EMULATED_NAME)
    set(ARG_EMULATED_NAME ${target}_emulated)
  endif()
  get_target_property(type ${target} TYPE)
  if(type STREQUAL "EXECUTABLE")
    set(scope PRIVATE)
  else()
    set(scope PUBLIC)
  endif()
  get_target_property(sources ${target} SOURCES)
  get_target_property(dir ${target} SOURCE_DIR)
  get_target_property(libs ${target} LINK_LIBRARIES)
  if(NOT libs)
    set(libs "")
  endif()
  if(SWITCHYARD_CUDA AND ARG_CUDA_LIBS)
    target_link_libraries(${target} ${scope} ${ARG_CUDA_LIBS})
  endif()
  if(SWITCHYARD_CUDA_EMULATOR)
    list(TRANSFORM sources PREPEND "${dir}/" REGEX "^[^/]")
    if(type STREQUAL "EXECUTABLE")
      add_executable(${ARG_EMULATED_NAME} ${sources})
    else()
      add_library(${ARG_EMULATED_NAME} STATIC ${sources})
    endif()
    if(ARG_CUDA_LIBS)
      list(REMOVE_ITEM libs ${ARG_CUDA_LIBS})
    endif()
    _switchyard_swap_emulated(swapped ${libs})
    set(cuda_libs "")
    foreach(lib IN LISTS ARG_CUDA_LIBS)
      list(APPEND cuda_libs ${lib}_emulated)
    endforeach()
    target_link_libraries(${ARG_EMULATED_NAME} ${scope} ${swapped} ${cuda_libs})
  endif()
endfunction()

# out = the given libraries, each X that has an X_emulated swapped for it.
function(_switchyard_swap_emulated out)
  set(result "")
  foreach(lib IN LISTS ARGN)
    if(TARGET ${lib}_emulated)
      list(APPEND result ${lib}_emulated)
    else()
      list(APPEND result ${lib})
    endif()
  endforeach()
  set(${out} ${result} PARENT_SCOPE)
endfunction()
