// dcpp_writer: the writer process of AsyncSave's process executor (src/checkpoint/
// writer_process.h). Started by the library with `--fd N`, the Unix socket it serves; it exits
// when the socket closes. Not meant to be run by hand.
#include <cstdlib>
#include <cstring>
#include <iostream>

#include "checkpoint/writer_process.h"

int main(int argc, char** argv) {
  if (argc != 3 || std::strcmp(argv[1], "--fd") != 0) {
    std::cerr << "usage: dcpp_writer --fd N (started by dcpp's AsyncSave)\n";
    return 2;
  }
  return dcpp::internal::RunWriterProcess(std::atoi(argv[2]));
}
