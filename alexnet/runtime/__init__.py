"""Infrastructure: processes and devices, run directories, progress, atomic files, errors."""
