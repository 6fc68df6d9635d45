# `cmake --install`: headers, libraries, the CLI, a CMake package and pkg-config files.
#   find_package(dcpp) -> dcpp::dcpp, and dcpp::mpi when dcpp was built with MPI
#     (find_package(dcpp COMPONENTS mpi) fails where it was not);
#   pkg-config dcpp / dcpp-mpi -> the same libraries with their compile and link flags.
# The libraries are static unless BUILD_SHARED_LIBS is on, so their private dependencies (zlib,
# zstd) are part of what a consumer links.
include(CMakePackageConfigHelpers)

set(DCPP_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/dcpp)
install(TARGETS dcpp EXPORT dcppTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
set(DCPP_HAS_MPI OFF)
if(TARGET dcpp_mpi)
  set(DCPP_HAS_MPI ON)
  set_target_properties(dcpp_mpi PROPERTIES EXPORT_NAME mpi)
  install(TARGETS dcpp_mpi EXPORT dcppTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
endif()
if(TARGET dcpp_torch)
  set_target_properties(dcpp_torch PROPERTIES EXPORT_NAME torch)
  install(TARGETS dcpp_torch EXPORT dcppTorchTargets
    ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR} LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR})
  install(EXPORT dcppTorchTargets NAMESPACE dcpp:: DESTINATION ${DCPP_CMAKE_DIR})
endif()
install(DIRECTORY include/dcpp DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
if(TARGET dcpp_cli)
  install(TARGETS dcpp_cli RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
endif()
install(EXPORT dcppTargets NAMESPACE dcpp:: DESTINATION ${DCPP_CMAKE_DIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/dcppConfig.cmake.in
  ${CMAKE_BINARY_DIR}/dcppConfig.cmake INSTALL_DESTINATION ${DCPP_CMAKE_DIR})
write_basic_package_version_file(${CMAKE_BINARY_DIR}/dcppConfigVersion.cmake
  COMPATIBILITY SameMinorVersion)
install(FILES ${CMAKE_BINARY_DIR}/dcppConfig.cmake ${CMAKE_BINARY_DIR}/dcppConfigVersion.cmake
  DESTINATION ${DCPP_CMAKE_DIR})

# pkg-config: the prefix is found from the .pc file's own place (${pcfiledir}), so it is right
# for `cmake --install --prefix X` and when the installed tree is moved.
file(RELATIVE_PATH DCPP_PC_UP "/root/${CMAKE_INSTALL_LIBDIR}/pkgconfig" "/root")
set(DCPP_PC_PREFIX "\${pcfiledir}/${DCPP_PC_UP}")
if(IS_ABSOLUTE "${CMAKE_INSTALL_LIBDIR}" OR IS_ABSOLUTE "${CMAKE_INSTALL_INCLUDEDIR}")
  set(DCPP_PC_LIBDIR "${CMAKE_INSTALL_FULL_LIBDIR}")
  set(DCPP_PC_INCLUDEDIR "${CMAKE_INSTALL_FULL_INCLUDEDIR}")
else()
  set(DCPP_PC_LIBDIR "\${prefix}/${CMAKE_INSTALL_LIBDIR}")
  set(DCPP_PC_INCLUDEDIR "\${prefix}/${CMAKE_INSTALL_INCLUDEDIR}")
endif()
if(BUILD_SHARED_LIBS)
  set(DCPP_PC_LIBS "-L\${libdir} -ldcpp -pthread")
  set(DCPP_PC_LIBS_PRIVATE "-lzstd -lz -lxxhash")
  if(DCPP_HAVE_S3)
    string(APPEND DCPP_PC_LIBS_PRIVATE " -lcurl -lpugixml")
  endif()
else()
  set(DCPP_PC_LIBS "-L\${libdir} -ldcpp -lzstd -lz -lxxhash -pthread")
  if(DCPP_HAVE_S3)
    string(APPEND DCPP_PC_LIBS " -lcurl -lpugixml")
  endif()
  if(DCPP_ISAL_LIBRARY AND DCPP_ISAL_INCLUDE)
    string(APPEND DCPP_PC_LIBS " -lisal")
  endif()
  if(DCPP_URING_LIBRARY AND DCPP_URING_INCLUDE)
    string(APPEND DCPP_PC_LIBS " -luring")
  endif()
  set(DCPP_PC_LIBS_PRIVATE "")
endif()
configure_file(${PROJECT_SOURCE_DIR}/cmake/dcpp.pc.in ${CMAKE_BINARY_DIR}/dcpp.pc @ONLY)
set(DCPP_PC_FILES ${CMAKE_BINARY_DIR}/dcpp.pc)
if(DCPP_HAS_MPI)
  configure_file(${PROJECT_SOURCE_DIR}/cmake/dcpp-mpi.pc.in ${CMAKE_BINARY_DIR}/dcpp-mpi.pc @ONLY)
  list(APPEND DCPP_PC_FILES ${CMAKE_BINARY_DIR}/dcpp-mpi.pc)
endif()
install(FILES ${DCPP_PC_FILES} DESTINATION ${CMAKE_INSTALL_LIBDIR}/pkgconfig)
