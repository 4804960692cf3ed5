# OpenSim-CMS 1.1 as it was written for: PHP 5.6 with Apache, mod_rewrite (api/.htaccess) and mysqli.
# The stock php:5.6-apache image has neither the rewrite module on nor the MySQL extensions built.
FROM php:5.6-apache
RUN a2enmod rewrite headers expires \
    && docker-php-ext-install mysqli pdo_mysql
# api/.htaccess needs AllowOverride to take effect.
RUN sed -i '/<Directory \/var\/www\/>/,/<\/Directory>/ s/AllowOverride None/AllowOverride All/' /etc/apache2/apache2.conf
