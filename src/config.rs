//! Loading the configuration: file, environment, command line. (Being written.)
