# `cmake --install`: the hybrit command, the shipped configs (share/hybrit/configs), the public
# headers (include/hybrit/<layer>/...) and the libraries as a CMake package, so C++ users can
#   find_package(hybrit REQUIRED)
#   target_link_libraries(app PRIVATE hybrit::training)   # or hybrit::inference, hybrit::clustering, ...
# The libraries are static: hybritConfig.cmake finds the Debian packages they link (the same
# find_package and pkg-config calls as this build).
include(CMakePackageConfigHelpers)

install(FILES ${PROJECT_SOURCE_DIR}/configs/tiny.yaml ${PROJECT_SOURCE_DIR}/configs/small.yaml ${PROJECT_SOURCE_DIR}/configs/medium.yaml
              ${PROJECT_SOURCE_DIR}/configs/reduce.yaml ${PROJECT_SOURCE_DIR}/configs/dispatch.yaml ${PROJECT_SOURCE_DIR}/configs/README.md
        DESTINATION ${CMAKE_INSTALL_DATADIR}/hybrit/configs)

foreach(layer core backends dispatch model training clustering inference)
  install(DIRECTORY ${PROJECT_SOURCE_DIR}/${layer}/ DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/hybrit/${layer}
          FILES_MATCHING PATTERN "*.hpp" PATTERN "*.h")
endforeach()

set(hybrit_exported hybrit_core hybrit_backend_c hybrit_backends hybrit_dispatch hybrit_model hybrit_training hybrit_clustering hybrit_inference)
if(HYBRIT_HAVE_SERVER)
  list(APPEND hybrit_exported hybrit_server)
endif()
# hybrit::core, hybrit::training, ... (the target names without their hybrit_ prefix).
foreach(t IN LISTS hybrit_exported)
  string(REPLACE "hybrit_" "" short ${t})
  set_target_properties(${t} PROPERTIES EXPORT_NAME ${short})
endforeach()
install(TARGETS ${hybrit_exported} EXPORT hybritTargets ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR})
install(EXPORT hybritTargets NAMESPACE hybrit:: DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/hybrit)
configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/hybritConfig.cmake.in ${PROJECT_BINARY_DIR}/hybritConfig.cmake
                              INSTALL_DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/hybrit)
write_basic_package_version_file(${PROJECT_BINARY_DIR}/hybritConfigVersion.cmake COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/hybritConfig.cmake ${PROJECT_BINARY_DIR}/hybritConfigVersion.cmake DESTINATION ${CMAKE_INSTALL_LIBDIR}/cmake/hybrit)
